"""The frozen encoders (SD VAE, OpenCLIP-H text, CLIP ViT-H-14 vision) and the tiny random model set, shared by pipelines/ and trainer/."""
