"""Supervised fine-tuning: chat data (data.py), an existing model given the chat markers (vocab.py), loss
masks and packing (packing.py). The chat format itself is pipeline/chat.py's."""
