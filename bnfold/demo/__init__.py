"""`bnfold demo`: `lab` builds the digits model and the shifted lab, `images` writes lab images, `run` tells the story."""
