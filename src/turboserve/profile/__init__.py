"""turboserve.profile"""
