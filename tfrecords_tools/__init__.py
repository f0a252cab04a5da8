"""DICOM breast DCE-MRI exam folders -> canonical volumes -> sharded TFRecords.

This package never imports ``mri_keras``; ``schema`` is the single definition of the record
format and is imported by the ``mri_keras`` reader.
"""
