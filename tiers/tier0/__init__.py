"""Tier 0: the keyword spotter on a microcontroller.

Audio data (`data`), the MFCC front end shared by training and firmware
(`features`), Keras training, int8 quantisation, verification on the TFLite
Micro interpreter, the .tflite-to-C compiler (`compiler/`, entry point
`export`), firmware build for the emulated board (`firmware`), flash and monitor.
"""
