"""The baselines the source tried first, done right: the GAN (gan.py). The pixel DDPM is train_ddpm.py on the
walkthrough's own UNet and schedule."""
