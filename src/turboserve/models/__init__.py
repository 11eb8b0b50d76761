"""turboserve.models"""
