"""The shipped tiny OCR model (package data), its builders and its data generator (the trainer that made it is
an application: ``sparsemm.app.train``)."""
