"""turboserve.sim"""
