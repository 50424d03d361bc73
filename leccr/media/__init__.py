"""Media: decoding images and sampling video frames, where an item's file lies, and the image processors."""
