"""The forecaster both sides share: model, features and the public pretrained initial model.

The coordinator builds the first global model from it and nodes fine-tune and evaluate it, so it
lives outside both `server/` and `client/` (docs/DESIGN.md, "Where things are"). It imports
torch and `core`, never node, coordinator or simulation code.
"""
