"""A user's project: its own LightningModule (``digitlab.lit``) and data (``digitlab.data``)."""
