"""The shipped tiny OCR model (package data), its data generator and trainer."""
