"""wsiseg_train: training module for wsiseg's U-Net (installed from the training/ folder)."""
