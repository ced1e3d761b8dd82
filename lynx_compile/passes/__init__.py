"""Stage 1-2: find MoE routing sites in post-grad FX graphs and rewrite them.

max_routing.py     routers picking experts by k rounds of max + mask -> aten.topk (or reported)
find_routing.py    classify every aten.topk: routing site (and its form) or not (and why)
phase.py           decide per site whether its batches are decode batches
live_rows.py       the in-graph mask of rows fed the pad token (dead rows do not vote)
fuse_experts.py    the expert dispatch after a decode site -> lynx.moe_experts
rewrite_routing.py routing top-k -> lynx.batch_select
pass_manager.py    the Inductor custom pass running these in order, composed with user passes
"""
