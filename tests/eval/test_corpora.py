"""The offline corpora: disjoint, deterministic splits; well-formed problems."""

from lynx_compile.eval import corpora


def test_code_split_is_by_file_disjoint_and_honours_the_held_out_list():
    train, heldout = corpora.code_files("train"), corpora.code_files("heldout")
    assert train and heldout
    assert not set(train) & set(heldout)
    assert {corpora.top_level_module(path) for path in heldout} <= set(corpora.HELD_OUT_MODULES)
    assert not {corpora.top_level_module(path) for path in train} & set(corpora.HELD_OUT_MODULES)
    assert all(not path.startswith("/") for path in train + heldout)  # no machine paths
    assert train == sorted(train)


def test_arithmetic_splits_are_disjoint_correct_and_seeded():
    train = corpora.arith_problems("train", 2000, seed=1)
    heldout = corpora.arith_problems("heldout", 500, seed=1)
    assert not {p for p, _ in train} & {p for p, _ in heldout}
    assert heldout == corpora.arith_problems("heldout", 500, seed=1)
    for prompt, answer in heldout[:50]:
        assert prompt.endswith("=") and str(eval(prompt[:-1])) == answer  # noqa: S307 - digits and +-*


def test_code_line_problems_are_held_out_prefixes_ending_at_a_newline():
    heldout = set(corpora.code_texts("heldout"))
    for prefix, next_line in corpora.code_line_problems(20, seed=0):
        assert prefix.endswith("\n") and next_line and "\n" not in next_line
        assert len("".join(next_line.split())) >= corpora.MIN_NEXT_LINE_CHARS
        assert any(text.startswith(prefix + next_line) for text in heldout)
