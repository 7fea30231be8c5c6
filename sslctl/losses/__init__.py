"""Loss functions as pure building blocks, documented with their paper and shapes.

- contrastive.py: InfoNCE (MoCo, AdCo), NT-Xent (SimCLR), BYOL's regression loss.
- clustering.py, local.py: SwAV's swapped prediction, AMDIM/CPC's local NCE.
- noncontrastive.py: SimSiam's stop-gradient cosine, Barlow Twins' cross-correlation, VICReg's terms.
"""
