"""What the tests and the GPU tools share: building our model on a random release (models.py) and
the Triton kernels' cases against their torch references (cases.py). Product code never imports it."""
