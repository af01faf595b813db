"""The three stages a --mode runs: pretrain (SimCLR), downstream (the frozen probes, fine-tune vs
scratch, baselines), distill (SimCLRv2's student). They share train/ and evaluation/, never import
each other."""
