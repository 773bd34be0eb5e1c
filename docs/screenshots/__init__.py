"""The app screenshots and the script that regenerates them."""
