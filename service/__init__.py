"""The bnfold recalibration service: an HTTP jobs API over `bnfold.pipeline` (see README.md)."""
