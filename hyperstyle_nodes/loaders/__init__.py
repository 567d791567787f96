"""Files in and out: checkpoint reading (official key names mapped here), the weights registry and downloads, saved
inversions, and the GPU-resident model cache the nodes share."""
