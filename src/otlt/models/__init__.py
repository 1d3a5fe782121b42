"""Models: CIFAR ResNets, ResNet-50, the cosine head, and a registry."""
