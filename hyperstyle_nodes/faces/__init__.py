"""Faces in photos: detection, landmarks, the FFHQ alignment crop and pasting the result back."""
