"""HyperStyle (Alaluf et al., CVPR 2022): a W/e4e encoder gives W+ codes, a hypernetwork predicts per-image offsets
to the generator's convolution weights (encoders.py, hypernetwork.py, model.py), and an optional iterator refines the
result (optimize.py)."""
