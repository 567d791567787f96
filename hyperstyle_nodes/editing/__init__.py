"""Edits on inverted codes: direction files (InterFaceGAN, GANSpace, the user's own) and StyleCLIP text edits."""
