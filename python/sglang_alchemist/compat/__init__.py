"""Compatibility glue that lets the real SGLang run where its defaults assume a CUDA GPU."""
