"""Axolotl integration: the `cat_merge` config block, the plugin hooks and the trainer."""
