"""Example handlers shipped with the package: the demo's and the image's default route."""
