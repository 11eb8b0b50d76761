"""turboserve.serving"""
