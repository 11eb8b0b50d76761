"""turboserve.cluster"""
