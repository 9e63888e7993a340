"""Test helpers qcore ships for plugin authors: a toy quantizer and the conformance suite."""
