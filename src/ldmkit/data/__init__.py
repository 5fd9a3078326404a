"""ldmkit.data: the built-in shapes data, MS-COCO captions and image folders."""
