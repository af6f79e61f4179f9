"""Reusable signals: attention rows from Q and K (`attention`) and rotary positions (`rope`)."""
