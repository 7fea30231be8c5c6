"""Networks torchvision lacks (the AMDIM encoder, CPC's patch-grid encoder), registered by name in
`sslctl.encoders.CUSTOM`; `sslctl.encoders.build_encoder` builds them from a recipe's [encoder]
section, filling a custom factory's keyword arguments from the keys of the same name (the AMDIM
encoder reads `ndf`, `n_rkhs`, `depth`, `input_size`). `build_backbone` keeps a custom net's
options on it as `.options`, so its encoder.safetensors can rebuild it.
"""
