"""The one StyleGAN2 generator every engine decodes with (rosinality's layout and key names), its CUDA-graph replay
and the torch.compile warm-up that makes it fast on the GPU."""
