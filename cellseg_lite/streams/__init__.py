"""The two segmentation streams of the multi-stream method, one file per method.

``stardist`` (star-convex polygons: head, targets, loss, NMS post-processing) and
``hover`` (horizontal/vertical distance maps: head, targets, loss, watershed
post-processing). Import them by name (``from cellseg_lite.streams import stardist``);
this package imports nothing itself, so that importing one stream never loads the other.
"""
