"""Skill LoRAs, before anything is wrapped: `locate.py` finds a skill's files (a folder or a
Hub repo), `read.py` reads them into plain tensors, `check.py` refuses what CAT cannot
compose, `experts.py` reads LoRA on MoE expert weights, `plan.py` says which skill goes on
which base module. Imports the layers (the experts' layout), never the granularities or the
export."""
