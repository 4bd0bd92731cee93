"""The source side: serves guest memory (image, live process, buffer) to destinations."""
