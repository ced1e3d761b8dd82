"""Stage 1-2: find MoE routing sites in post-grad FX graphs and rewrite them.

find_routing.py    classify every aten.topk: routing site (and its form) or not (and why)
phase.py           decide per site whether its batches are decode batches
rewrite_routing.py routing top-k -> lynx.batch_select
pass_manager.py    the Inductor custom pass running these in order, composed with user passes
"""
