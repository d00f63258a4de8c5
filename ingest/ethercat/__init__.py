"""EtherCAT: field-bus captures (pcap/pcapng) and live bus traffic as robot signals."""
