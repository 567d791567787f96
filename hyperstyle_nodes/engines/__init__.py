"""Inversion engines, side by side: each folder holds one method's encode -> edit -> decode path over the shared
generator in `hyperstyle_nodes.stylegan2`."""
