"""StyleFeatureEditor (Bobkov et al., CVPR 2024): inverter (W+ codes + an F-space feature), feature editor, and
the shared StyleGAN2 decoding with that feature in place of the generator's own."""
