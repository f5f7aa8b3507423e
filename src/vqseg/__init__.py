"""Label-efficient (semi-supervised) medical image segmentation: VQ-Seg, PDCR/UAFS and their peers."""

__version__ = "0.1.0"
