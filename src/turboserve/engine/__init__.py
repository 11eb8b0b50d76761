"""turboserve.engine"""
