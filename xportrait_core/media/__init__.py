"""Video and image input/output and the image-format conversions every other part shares."""
