"""Tier 0: the keyword spotter on a microcontroller.

Audio data (`data`), the MFCC front end shared by training and firmware
(`features`), Keras training, int8 quantisation, verification on the TFLite
Micro interpreter, C code generation, firmware build, flash and monitor.
"""
