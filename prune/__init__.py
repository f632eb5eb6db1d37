"""Network slimming (Liu et al. 2017): L1 on BatchNorm scales, global-threshold channel
pruning with coupled channels removed together, and the measurements around it.

One job per module, none of which touches processes (the stages in `launch/stages/` do):
- `l1`: the sparsity regulariser, a wrapper around any trainer `Task`;
- `threshold`: the global |gamma| threshold and per-layer floors (which channels survive);
- `shrink`: coupling (Torch-Pruning's DependencyGraph), act(beta) folding, physical removal;
- `measure`: parameters, MACs/FLOPs, CPU latency;
- `plots`: |gamma| histograms and kept-width bars;
- `config`: the `sparsity`, `prune` and `finetune` config sections.
"""
