"""rcic: train RxRx1-style models as a chain of time-budgeted, exactly resumable stages."""
__version__ = "0.2.0"
