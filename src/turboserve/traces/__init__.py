"""turboserve.traces"""
