"""Stages 1-2 and 4: find MoE routing sites in post-grad FX graphs, rewrite them, lower them.

max_routing.py            routers picking experts by k rounds of max + mask -> aten.topk (or reported)
find_routing.py           classify every aten.topk: routing site (and its form) or not (and why);
                          resolves each selectable site's setting once
router_scores.py          its scores traced back to the router linear (softmax, bias, masks, ...)
dispatch_evidence.py      whether its indices pick experts, and the evidence explain prints
expert_parallel.py        an expert-parallel rank's global -> local id mapping, proven
zero_experts.py           a split into real and zero-compute experts, proven
frame.py, plan_reach.py   what the compiled frame says (site names, expert owners); plan checks
phase.py                  decide per site whether its batches are decode batches
live_rows.py              the in-graph mask of rows fed the pad token (dead rows do not vote)
dispatch_region.py        the expert dispatch after a site, as a region of the graph
expert_layout.py          what that region computes, proven by running it (gate / up / down views)
fuse_experts.py           the region -> lynx.moe_experts (fuse_experts_inductor.py: -> aten._grouped_mm)
rewrite_routing.py        routing top-k -> lynx.batch_select
lower_selection.py        lynx.batch_select -> its aten body, for Inductor to generate kernels from
pass_manager.py           the Inductor custom pass running these in order, composed with user passes
fx_match.py               helpers for reading post-grad graphs and inserting traced bodies
"""
