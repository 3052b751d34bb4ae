"""Live inference on camera streams: sources, the latest-frame pipeline, the IoU tracker, events and snapshots.

Importing this package is cheap: OpenCV and picamera2 are imported only when a stream actually runs.
"""
