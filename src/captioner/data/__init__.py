"""Datasets: sources of image-caption pairs, image decoding under limits, URL fetching, the
built-in generated scenes and dataset hygiene checks."""
