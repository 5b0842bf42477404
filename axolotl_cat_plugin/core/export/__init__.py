"""From a fitted CAT model to one standard PEFT LoRA folder: `fold.py` folds the coefficients
into the factors, `compress.py` pads and SVD-compresses them, `summary.py` reads the record
into tables, `card.py` and `plot.py` describe it (`serving.py`: what a server needs to
know), `write.py` composes and writes the folder atomically. `summary.py`, `card.py`,
`plot.py` and `serving.py` are torch-free (`axolotl-cat inspect`)."""
