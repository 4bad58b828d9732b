"""Did the adaptation help? Label-free signals, a labelled check that can refuse, and an HTML page."""
